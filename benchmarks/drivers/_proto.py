"""The line protocol every benchmark driver speaks (stdlib only: it also runs in the peers'
virtualenvs, where sa-jobs is not installed).

A driver is a script ``python DRIVER.py COMMAND --dsn DSN [...]``:

``setup``      drop and (re)install the system's schema in the database.
``load``       bulk-load ``--n`` no-op jobs, args ``{"n": i}`` (not timed; drains start from it).
``enqueue``    time enqueueing ``--n`` jobs ``--mode single|batch|bulk``; prints JSON. Around
               the timed section it prints ``timing`` and ``timed``, each time waiting for
               ``go`` on stdin: the parent samples the server's CPU there (``timed_mark``).
``produce``    enqueue one job per transaction at ``--rate``/s for ``--seconds``; writes
               ``n t_call t_committed`` lines to ``--out``.
``worker``     prints ``ready``, waits for ``go`` on stdin, works the queue with
               ``--concurrency`` until ``stop``, then writes ``n t_start`` per handled job to
               ``--out`` and prints ``stopped``.
``info``       prints JSON: version, ``done_sql`` (count of finished jobs), ``verify_sql``
               (finished / not finished / total rows).

Handlers record the job's ``n`` and start time in a temporary file as they go (not in memory:
the soak measures the worker's RSS, which a list of a million records would inflate); the
parent checks from SQL that every n ran exactly once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Optional

_RECORD_LOCK = threading.Lock()
_records: Optional[IO[str]] = None
_handled = 0


def record(n: int) -> None:
    global _records, _handled
    t = time.time()
    with _RECORD_LOCK:
        if _records is None:
            _records = tempfile.NamedTemporaryFile("w", prefix="handled-", suffix=".tsv", delete=False,
                                                   buffering=1 << 16)
        _records.write(f"{n}\t{t:.6f}\n")
        _handled += 1


def handled() -> int:
    """How many jobs this process has recorded so far."""
    return _handled


def write_handled(path: str) -> None:
    global _records
    with _RECORD_LOCK:
        if _records is None:
            open(path, "w").close()
            return
        _records.close()
        shutil.move(_records.name, path)
        _records = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["setup", "load", "enqueue", "produce", "worker", "info"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--completed", type=int, default=0, help="load: also this many finished rows")
    p.add_argument("--mode", default="single")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--max-claim", type=int, default=0)
    p.add_argument("--variant", default="")
    p.add_argument("--out", default="")
    return p


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for(word: str) -> None:
    while True:
        line = sys.stdin.readline()
        if not line:
            return  # parent gone: behave as if told
        if line.strip() == word:
            return


def timed_mark(word: str) -> None:
    """Enqueue: says ``word`` (``timing`` before the timed section, ``timed`` after it) and
    waits for the parent's ``go``, so the server's CPU is sampled at the section's edges and
    the driver's start-up (connections, warm-up) stays out of the CPU per job as it does out
    of the jobs/s."""
    say(word)
    wait_for("go")


def stdin_watcher(word: str, on_word: Callable[[], None]) -> threading.Thread:
    """Calls ``on_word`` (from a thread) when ``word`` arrives on stdin."""
    def run() -> None:
        wait_for(word)
        on_word()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def paced(rate: float, seconds: float, enqueue_one: Callable[[int], float]) -> list[tuple[int, float, float]]:
    """Calls ``enqueue_one(n) -> t_committed`` at a fixed rate (open loop, no catch-up burst)."""
    out = []
    interval = 1.0 / rate
    start = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        target = start + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_call = time.time()
        t_committed = enqueue_one(n)
        out.append((n, t_call, t_committed))
    return out


def write_produced(path: str, rows: list[tuple[int, float, float]]) -> None:
    with open(path, "w") as f:
        f.write("".join(f"{n}\t{a:.6f}\t{b:.6f}\n" for n, a, b in rows))


_OUT_LOCK = threading.Lock()


def start_progress(interval: float = 0.02) -> None:
    """Prints ``p <handled>`` every ``interval`` seconds so the parent sees progress cheaply."""
    def run() -> None:
        last = -1
        while True:
            time.sleep(interval)
            n = _handled
            if n != last:
                last = n
                with _OUT_LOCK:
                    sys.stdout.write(f"p {n}\n")
                    sys.stdout.flush()

    threading.Thread(target=run, daemon=True).start()


def finish_worker(out: str) -> None:
    write_handled(out)
    with _OUT_LOCK:
        sys.stdout.write(f"stopped {_handled}\n")
        sys.stdout.flush()
