"""Client instructions per enqueued job, stable on a busy machine (valgrind's callgrind).

    python benchmarks/experiments/enqueue_ir.py --dsn postgresql://postgres@127.0.0.1:5432/scratch \
        --mode single --n 50,250

Runs this script under ``valgrind --tool=callgrind`` once per job count (after the same
warm-up) and prints (Ir(n2) - Ir(n1)) / (n2 - n1): the instructions the client executes
per job, import and warm-up excluded. The loops are the benchmark driver's. The
database's sa_jobs schema is reinstalled.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(dsn: str, mode: str, n: int) -> None:
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from benchmarks.experiments.enqueue_cost import run
    from benchmarks.kinds import BenchNoop
    from sa_jobs._url import sqlalchemy_url

    engine = create_engine(sqlalchemy_url(dsn))
    with Session(engine) as s, s.begin():
        s.add(BenchNoop(n=-1))
    run(engine, mode, 20 if mode == "single" else 1000, 1000)  # warm every cache the loop uses
    run(engine, mode, n, 1000)
    engine.dispose()


def instructions(dsn: str, mode: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        r = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
             "--child", "--dsn", dsn, "--mode", mode, "--n", str(n)],
            capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", r.stderr)
        assert m, r.stderr[-2000:]
        return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--mode", default="single")
    ap.add_argument("--n", default="50,250")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.dsn, a.mode, int(a.n))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.drivers import sajobs as driver

    driver.setup(a.dsn)
    n1, n2 = (int(x) for x in a.n.split(","))
    i1, i2 = instructions(a.dsn, a.mode, n1), instructions(a.dsn, a.mode, n2)
    print(f"{a.mode}: {(i2 - i1) / (n2 - n1):,.0f} client instructions/job (Ir {i1:,} at n={n1}, {i2:,} at n={n2})")


if __name__ == "__main__":
    main()
