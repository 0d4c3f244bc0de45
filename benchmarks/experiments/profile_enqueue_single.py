"""cProfile of 1,000 x (Session.add + commit) on a private cluster.

    python benchmarks/experiments/profile_enqueue_single.py
"""
import sys, cProfile, pstats, io, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.cluster import Cluster
from benchmarks.drivers import sajobs as driver
from benchmarks.kinds import BenchNoop
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sa_jobs._url import sqlalchemy_url
with Cluster() as c:
    dsn = c.create_database("e"); driver.setup(dsn)
    engine = create_engine(sqlalchemy_url(dsn))
    with Session(engine) as s, s.begin(): s.add(BenchNoop(n=-1))
    p = cProfile.Profile(); t0 = time.perf_counter(); c0 = time.process_time(); p.enable()
    for i in range(1000):
        with Session(engine) as s, s.begin(): s.add(BenchNoop(n=i))
    p.disable(); print(f"{1000/(time.perf_counter()-t0):.0f}/s, client {(time.process_time()-c0)*1000:.0f} us/job (profiled)")
    b = io.StringIO(); pstats.Stats(p, stream=b).sort_stats("tottime").print_stats(14); print(b.getvalue()[-3500:])
    b = io.StringIO(); pstats.Stats(p, stream=b).sort_stats("cumulative").print_stats(30); print(b.getvalue()[-5000:])
