"""Experiment: drain with the flush statement as shipped (PATCH unset) or with its state fence
hidden from the partial-index matcher (PATCH=1). Prints jobs/s, CPU per job and pg_stat_statements.

    PATCH=1 python benchmarks/experiments/flush_fence.py 20000 100
"""
import sys, os, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import anyio, psycopg
from benchmarks.cluster import Cluster
from benchmarks.drivers import sajobs as driver
from benchmarks.kinds import BenchNoop
import sa_jobs.queries as qmod
from sa_jobs import Worker
if os.environ.get("PATCH"):
    orig = qmod.Queries.for_schema.__func__
    def patched(cls, schema="sa_jobs"):
        q = orig(cls, schema)
        import dataclasses
        return dataclasses.replace(q, flush_outcomes=q.flush_outcomes.replace("j.state = 'running'", "(j.state || '') = 'running'"))
    qmod.Queries.for_schema = classmethod(patched)
N, C = int(sys.argv[1]), int(sys.argv[2])
with Cluster(extra_settings=("shared_preload_libraries=pg_stat_statements",)) as cluster:
    dsn = cluster.create_database("p"); driver.setup(dsn); driver.load(dsn, N, 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
    cpu = []
    async def run():
        async with Worker(dsn, kinds=[BenchNoop], queues={"bench": C}):
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while True:
                    await anyio.sleep(0.01)
                    cur = await conn.execute("SELECT count(*) FROM sa_jobs.jobs WHERE state IN ('available','running')")
                    if (await cur.fetchone())[0] == 0:
                        cpu.append(cluster.cpu_seconds()); return time.perf_counter()
    s0, c0, t0 = cluster.cpu_seconds(), time.process_time(), time.perf_counter()
    t1 = anyio.run(run)
    with psycopg.connect(dsn, autocommit=True) as conn:
        st = conn.execute("SELECT calls, total_exec_time, shared_blks_hit+shared_blks_read FROM pg_stat_statements WHERE query LIKE 'WITH c AS%'").fetchone()
    print(f"PATCH={os.environ.get('PATCH','')} N={N} C={C}: {N/(t1-t0):,.0f} jobs/s, server {(cpu[0]-s0)/N*1e6:.0f} us/job, client {(time.process_time()-c0)/N*1e6:.0f} us/job; flush calls {st[0]}, {st[1]/st[0]:.2f} ms/call, {st[2]/st[0]:.0f} buffers/call")
