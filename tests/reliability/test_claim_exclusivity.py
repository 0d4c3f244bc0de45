"""R5 claim exclusivity: the library's claim statement under 64 concurrent claimers.

8 OS processes x 8 connections drive ``Queries.for_schema(schema).claim`` directly (see
``claimers.py``) on three queues drained one after the other with batch limits 1, 10 and
100, once with the planner's defaults and once with ``enable_hashjoin`` and
``enable_mergejoin`` off (the join between the locked id list and the table must then be
a nested loop; with a non-MATERIALIZED CTE that is the shape that could re-scan the
subquery and lock more rows than LIMIT). Every returned (id, attempt, token) is recorded
and checked: each job claimed exactly once (attempt 1, one token, the token the row
holds), no claim returned more rows than its limit, every job claimed.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from sa_jobs.queries import Queries

from ..conftest import REPO_ROOT
from .support import scale

PROCS = 8
CONNS = 8
# Jobs per batch size: the default run is shortened; REL_FULL=1 (or -m slow) runs 100,000.
SIZES = {1: scale(2_000, 100_000), 10: scale(10_000, 100_000), 100: scale(20_000, 100_000)}


def _plan_joins(url: str, schema: str, limit: int, no_hash_merge: bool) -> str:
    def walk(node: dict) -> list[str]:
        out = [node["Node Type"] + (f"({node['Index Name']})" if "Index Name" in node else "")]
        for child in node.get("Plans", []):
            out += walk(child)
        return out

    with psycopg.connect(url, autocommit=True) as conn:
        if no_hash_merge:
            conn.execute("SET enable_hashjoin = off")
            conn.execute("SET enable_mergejoin = off")
        (plan,) = conn.execute("EXPLAIN (FORMAT JSON) " + Queries.for_schema(schema).claim,
                               {"queue": f"b{limit}", "limit": limit, "token": "00000000-0000-0000-0000-000000000000",
                                "owner": "x", "lease": 1}).fetchone()
    return " > ".join(walk(plan[0]["Plan"]))


def _run(db, rel_url: str, rel_schema: str, no_hash_merge: bool) -> None:
    for limit, n in SIZES.items():
        db.q("INSERT INTO {jobs} (kind, queue, priority) SELECT 'rel_work', %s, (random() * 3)::int"
             " FROM generate_series(1, %s)", (f"b{limit}", n))
    db.q("ANALYZE {jobs}")
    plans = {limit: _plan_joins(rel_url, rel_schema, limit, no_hash_merge) for limit in SIZES}
    tmp = Path(tempfile.mkdtemp(prefix="rel_r5_"))
    go = tmp / "go"
    cmd = [sys.executable, "-m", "tests.reliability.claimers", rel_url, rel_schema, "--go", str(go),
           "--conns", str(CONNS), *[a for limit in SIZES for a in ("--queue", f"b{limit}:{limit}")]]
    if no_hash_merge:
        cmd.append("--no-hash-merge")
    procs = [subprocess.Popen([*cmd, "--out", str(tmp / f"p{i}")], cwd=REPO_ROOT, stderr=subprocess.PIPE)
             for i in range(PROCS)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp / f"p{i}.ready").exists() for i in range(PROCS)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read().decode() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        started = time.monotonic()
        go.touch()
        for p in procs:
            p.wait(timeout=600)
        elapsed = time.monotonic() - started
        assert [p.returncode for p in procs] == [0] * PROCS, [p.stderr.read().decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    claims: dict[int, list[int]] = collections.defaultdict(list)
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    token_of: dict[int, str] = {}
    for i in range(PROCS):
        for line in (tmp / f"p{i}").read_text().splitlines():
            if not line:
                continue
            parts = line.split()
            if parts[0] == "C":
                limit, got = int(parts[2]), int(parts[4])
                assert got <= limit, f"a claim with limit {limit} returned {got} rows"
                claims[limit].append(got)
            else:
                job_id, attempt, token = int(parts[1]), int(parts[2]), parts[3]
                seen[(job_id, attempt)] += 1
                token_of[job_id] = token
    twice = [k for k, c in seen.items() if c > 1]
    assert twice == [], f"(job, attempt) claimed more than once: {twice[:10]}"
    total = sum(SIZES.values())
    assert len(seen) == total and {a for _, a in seen} == {1}
    rows = db.q("SELECT id, state, attempt, claim_token::text FROM {jobs}")
    assert len(rows) == total
    bad = [r for r in rows if (r[1], r[2]) != ("running", 1) or token_of.get(r[0]) != r[3]]
    assert bad == [], bad[:10]
    for limit, got in claims.items():
        assert sum(got) == SIZES[limit]
    summary = ", ".join(
        f"batch {limit}: {SIZES[limit]} jobs, {len(got)} claims ({sum(1 for g in got if g == 0)} empty,"
        f" {sum(1 for g in got if 0 < g < limit)} partial, max {max(got)})" for limit, got in sorted(claims.items()))
    print(f"\nR5 ({'hash/merge join off' if no_hash_merge else 'planner defaults'}): {PROCS}x{CONNS} claimers,"
          f" {total} jobs in {elapsed:.1f}s ({total / elapsed:.0f} jobs/s); {summary};"
          f" 0 duplicates, 0 over-limit; plans: {json.dumps(plans)}")


@pytest.mark.parametrize("no_hash_merge", [False, True], ids=["defaults", "no_hash_merge"])
def test_r5_claim_exclusivity(db, rel_url, rel_schema, no_hash_merge):
    _run(db, rel_url, rel_schema, no_hash_merge)


@pytest.mark.slow
@pytest.mark.parametrize("no_hash_merge", [False, True], ids=["defaults", "no_hash_merge"])
def test_r5_claim_exclusivity_full(db, rel_url, rel_schema, no_hash_merge, monkeypatch):
    """The issue's size: 100,000 jobs per batch size (300,000 claims' worth per variant)."""
    monkeypatch.setitem(SIZES, 1, 100_000)
    monkeypatch.setitem(SIZES, 10, 100_000)
    monkeypatch.setitem(SIZES, 100, 100_000)
    _run(db, rel_url, rel_schema, no_hash_merge)
