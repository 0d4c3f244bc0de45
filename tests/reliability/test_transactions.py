"""R15: jobs commit and roll back with business rows, savepoints included.

Threads run business transactions (commit, rollback, a savepoint rolled back inside a
committed transaction, a savepoint released) while worker processes drain the queue.
A job exists iff its business row committed, and no worker ever claims an uncommitted
job: each handler checks its business row is visible to it.
"""

from __future__ import annotations

import itertools
import random
import threading

from sqlalchemy import text
from sqlalchemy.orm import Session

from .rel_jobs import RelBiz
from .support import WorkerProc, scale, wait_for


def test_job_exists_iff_business_row_committed(db, rel_url, rel_schema, rel_engine, workers):
    n = scale(1000, 10_000)
    ids = itertools.count(1)
    committed: set[int] = set()
    lock = threading.Lock()
    insert = text(f'INSERT INTO "{rel_schema}".business (id, note) VALUES (:id, :note)')  # noqa: S608 - test-owned name

    def business(seed: int, count: int) -> None:
        rng = random.Random(seed)
        for _ in range(count):
            with lock:
                a, b = next(ids), next(ids)
            choice = rng.choice(["commit", "rollback", "savepoint_rollback", "savepoint_release"])
            with Session(rel_engine) as session:
                session.begin()
                session.execute(insert, {"id": a, "note": choice})
                session.add(RelBiz(business_id=a))
                keep = {a}
                if choice.startswith("savepoint"):
                    nested = session.begin_nested()
                    session.execute(insert, {"id": b, "note": choice})
                    session.add(RelBiz(business_id=b))
                    session.flush()
                    if choice == "savepoint_rollback":
                        nested.rollback()
                    else:
                        nested.commit()
                        keep.add(b)
                session.flush()
                if choice == "rollback":
                    session.rollback()
                else:
                    session.commit()
                    with lock:
                        committed.update(keep)

    ws = [WorkerProc(rel_url, rel_schema, "--concurrency", "8", "--lease", "5", "--maintenance-interval", "0.2",
                     "--poll-interval", "0.1") for _ in range(2)]
    workers += ws
    threads = [threading.Thread(target=business, args=(i, n // 4)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_for(lambda: db.states() == {"completed": len(committed)}, 60), (db.states(), len(committed))
    job_ids = {r[0] for r in db.q("SELECT (args->>'business_id')::bigint FROM {jobs}")}
    business_ids = {r[0] for r in db.q("SELECT id FROM {business}")}
    assert job_ids == business_ids == committed
    assert db.q("SELECT note, count(*) FROM {effects} GROUP BY note") == [("ok", len(committed))]
    for w in ws:
        assert w.stop() == 0
    print(f"R15: {n} business transactions, {len(committed)} committed jobs, 0 orphans, 0 uncommitted claims")
