"""The "limit" baseline: plain psycopg, claim 100 with SKIP LOCKED, batched ack. Not a job
library (no leases, retries or notifications); it bounds what the hardware allows for the
same claim/ack round trips. See _proto.py for the protocol."""

from __future__ import annotations

import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _proto  # noqa: E402
import psycopg  # noqa: E402

CLAIM = ("UPDATE plain_jobs SET state = 'running' WHERE id IN (SELECT id FROM plain_jobs WHERE state = 'available'"
         " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, args")
ACK = "UPDATE plain_jobs SET state = 'done' WHERE id = ANY(%s)"


def main() -> None:
    a = _proto.parser().parse_args()
    if a.command == "info":
        _proto.emit({
            "system": "plain psycopg (claim 100 + batched ack)", "version": version("psycopg"),
            "driver": f"psycopg {version('psycopg')}",
            "pending_sql": "SELECT count(*) FROM plain_jobs WHERE state <> 'done'",
            "verify_sql": ("SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state <> 'done'),"
                           " count(*) FROM plain_jobs"),
        })
        return
    conn = psycopg.connect(a.dsn, autocommit=True)
    if a.command == "setup":
        conn.execute("DROP TABLE IF EXISTS plain_jobs")
        conn.execute("CREATE TABLE plain_jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                     " args jsonb NOT NULL, state text NOT NULL DEFAULT 'available')")
        conn.execute("CREATE INDEX plain_jobs_available ON plain_jobs (id) WHERE state = 'available'")
    elif a.command == "load":
        conn.execute("INSERT INTO plain_jobs (args) SELECT jsonb_build_object('n', g) FROM generate_series(0, %s - 1) g",
                     (a.n,))
        conn.execute("VACUUM ANALYZE plain_jobs")
    elif a.command == "enqueue":
        conn.execute("INSERT INTO plain_jobs (args) VALUES ('{\"n\": -1}')")
        _proto.timed_mark("timing")
        t0, c0 = time.perf_counter(), time.process_time()
        if a.mode == "single":
            for i in range(a.n):
                conn.execute("INSERT INTO plain_jobs (args) VALUES (%s::jsonb)", (f'{{"n": {i}}}',))
        elif a.mode == "batch":
            for lo in range(0, a.n, a.batch):
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO plain_jobs (args) VALUES (%s::jsonb)",
                                    [(f'{{"n": {i}}}',) for i in range(lo, min(a.n, lo + a.batch))])
        else:
            with conn.transaction(), conn.cursor() as cur, cur.copy("COPY plain_jobs (args) FROM STDIN") as copy:
                for i in range(a.n):
                    copy.write_row((f'{{"n": {i}}}',))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        _proto.timed_mark("timed")
        _proto.emit({"n": a.n, "seconds": seconds, "client_cpu_seconds": cpu,
                     "api": {"single": "INSERT, autocommit", "batch": f"executemany({a.batch}) in 1 txn",
                             "bulk": "COPY, 1 txn"}[a.mode]})
    elif a.command == "worker":
        stop = threading.Event()
        _proto.say("ready")
        _proto.wait_for("go")
        _proto.start_progress()
        _proto.stdin_watcher("stop", stop.set)
        while not stop.is_set():
            rows = conn.execute(CLAIM, (100,), prepare=True).fetchall()
            if not rows:
                time.sleep(0.01)
                continue
            for _id, args in rows:
                _proto.record(args["n"])
            conn.execute(ACK, ([r[0] for r in rows],), prepare=True)
        _proto.finish_worker(a.out)
    else:
        raise SystemExit(f"plain: {a.command} not supported")


if __name__ == "__main__":
    main()
