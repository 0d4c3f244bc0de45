"""What sa-jobs adds to an ORM enqueue: the same inserts through a bare SQLAlchemy model.

    python benchmarks/experiments/orm_baseline.py [--single 2000] [--batch 20000] [--reps 3]

On a private cluster (benchmarks/cluster.py), times `Session.add` + commit (one row per
transaction) and `Session.add_all` of 1,000 rows per transaction for two mapped classes:
a sa-jobs kind (benchmarks.kinds.BenchNoop, into sa_jobs.jobs with its indexes and NOTIFY
trigger) and a bare declarative model with the columns such an INSERT writes (identity id,
kind, queue, JSONB args) in a table with no index but its primary key. Reports rows/s and
the client's CPU per row, median of --reps, the two classes interleaved. The bare model
is the ceiling of any ORM enqueue on the machine: what sa-jobs costs is the difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqlalchemy import BigInteger, Identity, Text, create_engine  # noqa: E402
from sqlalchemy.dialects.postgresql import JSONB  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.drivers import sajobs as driver  # noqa: E402
from benchmarks.kinds import BenchNoop  # noqa: E402
from sa_jobs._url import sqlalchemy_url  # noqa: E402


class _Base(DeclarativeBase):
    pass


class BareRow(_Base):
    __tablename__ = "bare_rows"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text)
    args: Mapped[dict[str, Any]] = mapped_column(JSONB)


MAKERS: dict[str, Callable[[int], Any]] = {
    "bare SQLAlchemy model": lambda i: BareRow(kind="bench_noop", queue="bench", args={"n": i}),
    "sa-jobs kind": lambda i: BenchNoop(n=i),
}


def timed(engine: Any, make: Callable[[int], Any], n: int, per_txn: int) -> tuple[float, float]:
    started, cpu0 = time.perf_counter(), time.process_time()
    for lo in range(0, n, per_txn):
        with Session(engine) as session, session.begin():
            session.add_all([make(i) for i in range(lo, min(n, lo + per_txn))])
    return n / (time.perf_counter() - started), (time.process_time() - cpu0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single", type=int, default=2_000, help="rows for one-row transactions")
    ap.add_argument("--batch", type=int, default=20_000, help="rows for add_all(1000) transactions")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with Cluster() as cluster:
        print(cluster.describe().get("version", ""), file=sys.stderr)
        dsn = cluster.create_database("orm_baseline")
        driver.setup(dsn)
        engine = create_engine(sqlalchemy_url(dsn))
        _Base.metadata.create_all(engine)
        for name, make in MAKERS.items():  # warm the mappers, the pool and the statement caches
            timed(engine, make, 10, 1)
        for _ in range(a.reps):
            for mode, n, per_txn in (("add + commit, 1 row/txn", a.single, 1), ("add_all, 1000 rows/txn", a.batch, 1000)):
                for name, make in MAKERS.items():
                    results.setdefault((mode, name), []).append(timed(engine, make, n, per_txn))
        engine.dispose()
    print(f"| mode | class | rows/s, median of {a.reps} (min-max) | client CPU µs per row |")
    print("|---|---|---|---|")
    for (mode, name), xs in results.items():
        rates = [x[0] for x in xs]
        cpu = statistics.median(x[1] for x in xs)
        print(f"| {mode} | {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {cpu:.0f} |")


if __name__ == "__main__":
    main()
