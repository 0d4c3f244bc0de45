"""R5 claim driver: one OS process running ``--conns`` concurrent claimers (threads, one
psycopg connection each) of the library's own claim statement
(``Queries.for_schema(schema).claim``).

Each queue named on the command line is drained in turn with its batch limit
(``--queue b1:1 --queue b10:10``). Every claim's answer is written to ``--out`` as lines
``C <queue> <limit> <token> <n>`` (one per claim) and ``R <id> <attempt> <token>`` (one per
returned row); the test reads all files. A claimer stops on a queue when its claim comes
back empty and no ``available`` row of that queue is left (an empty answer alone may only
mean every remaining row was locked by another claimer at that instant).

Start-up is synchronised: each process writes ``<out>.ready`` once its connections are
open, then waits for the file ``--go`` so that all claimers start together.

    python -m tests.reliability.claimers URL SCHEMA --out F --go G --queue b1:1 [--no-hash-merge]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from sa_jobs._url import to_conninfo
from sa_jobs.queries import Queries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("schema")
    p.add_argument("--out", required=True)
    p.add_argument("--go", required=True)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--queue", action="append", required=True, metavar="NAME:LIMIT")
    p.add_argument("--no-hash-merge", action="store_true")
    p.add_argument("--lease", type=float, default=3600.0)
    args = p.parse_args(argv)

    q = Queries.for_schema(args.schema)
    remaining = sql.SQL("SELECT count(*) FROM {} WHERE queue = %s AND state = 'available'").format(
        sql.Identifier(args.schema, "jobs"))
    plan = [(name, int(limit)) for name, limit in (item.rsplit(":", 1) for item in args.queue)]
    conns = []
    for _ in range(args.conns):
        c = psycopg.connect(to_conninfo(args.url), autocommit=True, application_name="rel_claimer")
        if args.no_hash_merge:
            c.execute("SET enable_hashjoin = off")
            c.execute("SET enable_mergejoin = off")
        conns.append(c)
    owner = f"claimer:{os.getpid()}"
    results: list[list[str]] = [[] for _ in conns]
    errors: list[BaseException] = []

    def claimer(i: int) -> None:
        conn, out = conns[i], results[i]
        try:
            for queue, limit in plan:
                while True:
                    token = uuid.uuid4()
                    rows = conn.execute(q.claim, {"queue": queue, "limit": limit, "token": token,
                                                  "owner": owner, "lease": args.lease}, prepare=True).fetchall()
                    out.append(f"C {queue} {limit} {token} {len(rows)}")
                    out.extend(f"R {r[0]} {r[4]} {token}" for r in rows)
                    if not rows and conn.execute(remaining, (queue,)).fetchone()[0] == 0:
                        break
        except BaseException as exc:  # noqa: BLE001 - reported to the test through the exit code
            errors.append(exc)

    Path(args.out + ".ready").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(args.go):
        if time.monotonic() > deadline:
            print("claimers: no go signal", file=sys.stderr)
            return 3
        time.sleep(0.01)
    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        for lines in results:
            f.write("\n".join(lines))
            f.write("\n")
    for c in conns:
        c.close()
    if errors:
        print(f"claimers: {errors!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
