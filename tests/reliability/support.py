"""Helpers of the reliability suite: worker processes, the audit trail, samplers."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import psycopg
from psycopg import sql

from sa_jobs._url import to_conninfo

from ..conftest import REPO_ROOT, worker_command
from ..helpers import wait_for  # noqa: F401 - re-exported for the reliability tests

MODULE = "tests.reliability.rel_jobs"


def scale(default: int, slow: int) -> int:
    """Counts for the default run, or for ``REL_FULL=1`` / the slow variants."""
    return slow if os.environ.get("REL_FULL") == "1" else default


class Db:
    """One autocommit connection for the test's own queries (reconnects after restarts)."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self._conn: Optional[psycopg.Connection[Any]] = None
        self._lock = threading.Lock()

    def _sql(self, text: str) -> sql.Composed:
        s = self.schema
        return sql.SQL(text).format(
            jobs=sql.Identifier(s, "jobs"), effects=sql.Identifier(s, "effects"),
            audit=sql.Identifier(s, "audit"), business=sql.Identifier(s, "business"),
        )

    def q(self, text: str, params: Any = None, *, raw: bool = False) -> list[tuple[Any, ...]]:
        query: Any = text if raw else self._sql(text)
        with self._lock:
            for attempt in range(50):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(to_conninfo(self.url), autocommit=True, connect_timeout=3)
                    cur = self._conn.execute(query, params)
                    return cur.fetchall() if cur.description else []
                except psycopg.OperationalError:
                    self._conn = None
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
        raise AssertionError("unreachable")

    def one(self, text: str, params: Any = None) -> Any:
        return self.q(text, params)[0][0]

    def states(self) -> dict[str, int]:
        return dict(self.q("SELECT state, count(*) FROM {jobs} GROUP BY state"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def setup_schema(url: str, schema: str) -> None:
    """Effects, business and an audit trail of every UPDATE on the jobs table.

    The audit row records the client port of the backend that made the change, so a
    test can attribute every row change to a worker process (psutil knows its ports).
    Row triggers fire only for rows actually changed: a fenced statement that matched
    nothing leaves no trace, which is exactly what "changed 0 rows" means.
    """
    stmts = [
        "CREATE TABLE {effects} (job_id bigint NOT NULL, attempt int NOT NULL, worker_pid int NOT NULL,"
        " note text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
        "CREATE TABLE {business} (id bigint PRIMARY KEY, note text)",
        "CREATE TABLE {audit} (seq bigserial PRIMARY KEY, job_id bigint, old_token uuid, new_token uuid,"
        " old_state text, new_state text, new_attempt int, sched_delay float8, lease_expires_at timestamptz,"
        " client_port int, at timestamptz DEFAULT clock_timestamp())",
        "CREATE FUNCTION {audit_fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " INSERT INTO {audit} (job_id, old_token, new_token, old_state, new_state, new_attempt, sched_delay,"
        "  lease_expires_at, client_port) VALUES (NEW.id, OLD.claim_token, NEW.claim_token, OLD.state, NEW.state,"
        "  NEW.attempt, extract(epoch FROM NEW.scheduled_at - now()), NEW.lease_expires_at, inet_client_port());"
        " RETURN NULL; END $$",
    ]
    with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
        for stmt in stmts:
            conn.execute(sql.SQL(stmt).format(
                effects=sql.Identifier(schema, "effects"), business=sql.Identifier(schema, "business"),
                audit=sql.Identifier(schema, "audit"), audit_fn=sql.Identifier(schema, "audit_fn"),
            ))


def enable_audit(url: str, schema: str) -> None:
    with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TRIGGER jobs_audit AFTER UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            sql.Identifier(schema, "jobs"), sql.Identifier(schema, "audit_fn")))


class WorkerProc:
    """A worker as a real OS process, its output in a file (a pipe could fill and block it)."""

    def __init__(self, url: str, schema: str, *args: str, effects_url: Optional[str] = None,
                 log_level: str = "WARNING", env: Optional[dict[str, str]] = None, module: str = MODULE) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="rel_worker_", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = worker_command(url, schema, module, *args)
        cmd[cmd.index("--log-level") + 1] = log_level
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REL_EFFECTS_URL": effects_url or url,
                    "SA_JOBS_DATABASE_URL": effects_url or url, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> Optional[int]:
        # A worker still importing has no signal handler yet: let it come up first.
        wait_for(lambda: not self.alive() or len(self.ports()) >= 2, 30)
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def ports(self) -> set[int]:
        import psutil

        try:
            return {c.laddr.port for c in psutil.Process(self.pid).net_connections(kind="tcp") if c.laddr}
        except psutil.Error:
            return set()

    def close(self) -> None:
        if self.alive():
            self.kill()
        self._log.close()
        self.log_path.unlink(missing_ok=True)


class Sampler(threading.Thread):
    """Runs ``probe()`` every ``every`` seconds in a thread; keeps the results."""

    def __init__(self, probe: Callable[[], Any], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.every = every
        self.samples: list[Any] = []
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.probe())
            except Exception as exc:  # noqa: BLE001 - a sample lost to a fault is recorded
                self.errors.append(exc)
            self._halt.wait(self.every)

    def stop(self) -> list[Any]:
        self._halt.set()
        self.join(10)
        return self.samples
