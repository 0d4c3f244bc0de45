"""EXPLAIN (ANALYZE) of the completer flush statement (Queries.flush_outcomes) for 10 and 200 ids,
custom and generic plans, on a private cluster: which index reaches the rows.

    python benchmarks/experiments/flush_plan.py
"""
import sys, re, uuid
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import psycopg
from benchmarks.cluster import Cluster
from benchmarks.drivers import sajobs as driver
from sa_jobs.queries import Queries
q = Queries.for_schema("sa_jobs")
params = sorted(set(re.findall(r"%\((\w+)\)s", q.flush_outcomes)))
print(params)
def nodes(p):
    yield p
    for c in p.get("Plans", []): yield from nodes(c)
with Cluster() as c:
    dsn = c.create_database("x"); driver.setup(dsn); driver.load(dsn, 20000, 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for batch in (10, 200):
            tok = uuid.uuid4()
            rows = conn.execute(q.claim, {"queue": "bench", "limit": batch, "token": tok, "owner": "x", "lease": 30}).fetchall()
            ids = [r[0] for r in rows]
            args = {k: [] for k in params}
            args.update(c_ids=ids, c_tokens=[tok]*len(ids), c_results=[None]*len(ids), c_progress=[None]*len(ids))
            for mode in ("force_custom_plan", "force_generic_plan"):
                conn.execute(f"SET plan_cache_mode = {mode}")
                with conn.transaction():
                    cur = conn.cursor()
                    # prepared statement, so generic/custom applies
                    cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + q.flush_outcomes, args, prepare=True)
                    plan = cur.fetchone()[0][0]
                    raise_rollback = True
                    conn.rollback() if False else None
                    # undo: the transaction block will commit; redo by re-claiming below is fine
                print(batch, mode, round(plan['Execution Time'], 2), [(n["Node Type"], n.get("Index Name") or n.get("Relation Name") or "", n.get("Actual Rows"), n.get("Actual Loops")) for n in nodes(plan["Plan"]) if n["Node Type"] not in ("Result",)][:14])
                # put the rows back to running for the next mode
                conn.execute("UPDATE sa_jobs.jobs SET state='running', finished_at=NULL, lease_expires_at=now()+interval '30s' WHERE id = ANY(%s)", (ids,))
