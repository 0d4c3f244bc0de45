"""A private PostgreSQL cluster for the benchmarks: initdb + pg_ctl on a free loopback port.

Debian's PostgreSQL binaries are used when present (``/usr/lib/postgresql/*/bin``), else the
ones shipped in the ``pgserver`` wheel. The server runs with default settings (fsync on);
only ``listen_addresses``, ``port``, the socket directory and ``max_connections`` (the
8-process drains of every peer need more than the default 100 slots) are set.
Root cannot run initdb, so as root the cluster runs as an unprivileged user (``pgserver``,
created by the pgserver package, or ``$SA_JOBS_BENCH_PG_USER``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import psycopg

# Settings recorded in the results (the server's own values, read back after start).
REPORTED_SETTINGS = (
    "server_version", "fsync", "synchronous_commit", "wal_level", "shared_buffers", "work_mem",
    "max_connections", "checkpoint_timeout", "max_wal_size", "autovacuum", "wal_sync_method",
    "full_page_writes", "jit",
)


def find_bin_dir() -> Path:
    env = os.environ.get("SA_JOBS_BENCH_PG_BIN")
    if env:
        return Path(env)
    # Newest first by number: Debian's names go 9.6, 10, ..., 15 (int("9.6") failed, and a
    # string sort put 9.6 after 15).
    debian = sorted((p for p in glob.glob("/usr/lib/postgresql/*/bin")
                     if all(part.isdigit() for part in Path(p).parent.name.split("."))),
                    key=lambda p: tuple(int(part) for part in Path(p).parent.name.split(".")))
    for d in reversed(debian):
        if Path(d, "initdb").exists():
            return Path(d)
    try:
        import pgserver  # noqa: F401

        d = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (d / "initdb").exists():
            return d
    except ImportError:
        pass
    raise RuntimeError("no PostgreSQL binaries found (install postgresql or the pgserver wheel)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    max_connections: int = 200
    bin_dir: Path = field(default_factory=find_bin_dir)
    port: int = 0
    data_dir: Optional[Path] = None
    run_as: Optional[str] = None
    _tmp: Optional[str] = None
    extra_settings: tuple[str, ...] = ()  # e.g. ("shared_preload_libraries=pg_stat_statements",) for profiling

    def _cmd(self, *argv: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *argv]
        return list(argv)

    def start(self) -> "Cluster":
        self._tmp = tempfile.mkdtemp(prefix="sa_jobs_bench_pg_")
        self.data_dir = Path(self._tmp) / "data"
        sock = Path(self._tmp) / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            self.run_as = os.environ.get("SA_JOBS_BENCH_PG_USER", "pgserver")
            try:
                pw = pwd.getpwnam(self.run_as)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", self.run_as], check=True)
                pw = pwd.getpwnam(self.run_as)
            for p in (self._tmp, str(sock)):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        subprocess.run(
            self._cmd(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                      "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={sock}"
                f" -c max_connections={self.max_connections}" + "".join(f" -c {x}" for x in self.extra_settings))
        subprocess.run(
            self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                      "-l", str(Path(self._tmp) / "server.log"), "-o", opts, "start"),
            check=True, stdout=subprocess.DEVNULL,
        )
        return self

    def stop(self) -> None:
        if self.data_dir is not None and self.data_dir.exists():
            subprocess.run(self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def postmaster(self) -> psutil.Process:
        assert self.data_dir is not None
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        return psutil.Process(pid)

    def cpu_seconds(self) -> float:
        """CPU (user+system) of the whole server so far: postmaster, live backends, reaped ones.

        A backend reaped between reading the postmaster and reading the backend would be in
        neither figure (a closed connection's whole CPU would land in the next sample), so the
        snapshot is read again until the postmaster's reaped-children times did not move."""
        pm = self.postmaster()
        for _ in range(100):
            before = pm.cpu_times()
            live = 0.0
            for child in pm.children():
                try:
                    c = child.cpu_times()
                    live += c.user + c.system
                except psutil.Error:
                    pass
            after = pm.cpu_times()
            if (before.children_user, before.children_system) == (after.children_user, after.children_system):
                return after.user + after.system + after.children_user + after.children_system + live
        raise RuntimeError("the server's backends kept exiting while its CPU was read")

    def backend_cpu_seconds(self, pid: int) -> float:
        """CPU (user+system) of one live backend so far: the harness's own connection, whose
        queries are subtracted from the server's figure."""
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    def settle(self, baseline: set[int], timeout: float = 3.0) -> None:
        """Wait until backends that are not in ``baseline`` have exited and been reaped, so
        their CPU shows in the postmaster's children times (else cpu_seconds misses it)."""
        deadline = time.time() + timeout
        pm = self.postmaster()
        while time.time() < deadline:
            if not {c.pid for c in pm.children()} - baseline:
                return
            time.sleep(0.01)

    def backend_pids(self) -> set[int]:
        return {c.pid for c in self.postmaster().children()}

    def describe(self) -> dict[str, Any]:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            version = conn.execute("SELECT version()").fetchone()[0]
            rows = conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                (list(REPORTED_SETTINGS),),
            ).fetchall()
        return {
            "version": version,
            "bin_dir": str(self.bin_dir),
            "port": self.port,
            "settings": {name: (f"{setting} {unit}" if unit else setting) for name, setting, unit in rows},
            "non_default_settings": ["listen_addresses=127.0.0.1", f"port={self.port}",
                                     "unix_socket_directories=<tmp>", f"max_connections={self.max_connections}",
                                     *self.extra_settings],
        }
