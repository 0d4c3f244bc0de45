"""A private PostgreSQL cluster for destructive tests (restart, terminate, roles, stats).

The shared server belongs to everyone: restarting it, terminating every ``sa_jobs:*``
backend or reading cluster-wide counters there would hurt other people's tests, and
chaos runs open more connections than it allows. Each test session gets one cluster of
its own in a temporary directory, listening on 127.0.0.1 on a free port, trust auth.
initdb refuses root, so as root the cluster runs as the unprivileged ``pgserver`` user
(created by the pgserver package) or one we create.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import psycopg

from sa_jobs import embedded

from ..conftest import pg_bin

_RUN_AS_CANDIDATES = ("pgserver", "sajobs_rel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as_user() -> Optional[str]:
    # Not embedded's own list (which starts with "postgres"): this cluster has always run as these.
    return embedded._run_as(_RUN_AS_CANDIDATES)


class PrivateCluster:
    def __init__(self, *, max_connections: int = 300) -> None:
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="sa_jobs_rel_pg_"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self.log = self.root / "server.log"
        self.port = free_port()
        self.max_connections = max_connections
        if self.user is not None:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self.user)
            shutil.chown(self.sock, self.user)

    # ---- commands ------------------------------------------------------------------

    def _cmd(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if self.user is not None:
            args = ["runuser", "-u", self.user, "--", *args]
        return subprocess.run(args, check=True, capture_output=True, text=True, **kw)

    def init(self) -> "PrivateCluster":
        self._cmd([pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                   "--no-sync", "-E", "UTF8", "--locale=C"])
        return self

    def options(self) -> str:
        return " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.sock}",
            f"-c max_connections={self.max_connections}", "-c fsync=off", "-c full_page_writes=off",
            "-c shared_buffers=128MB", "-c log_min_messages=warning",
        ])

    def start(self) -> "PrivateCluster":
        self._cmd([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                   "-o", self.options(), "start"])
        self.wait_ready(60)
        return self

    def restart_immediate(self) -> float:
        """``pg_ctl restart -m immediate``; returns monotonic time the server accepts again."""
        self._cmd([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                   "-m", "immediate", "-o", self.options(), "restart"])
        return self.wait_ready(60)

    def stop(self) -> None:
        try:
            self._cmd([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return time.monotonic()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_via(self, port: int, user: str = "postgres") -> str:
        """A URL that reaches this cluster through a proxy listening on ``port``."""
        return f"postgresql://{user}@127.0.0.1:{port}/postgres?sslmode=disable&gssencmode=disable"
